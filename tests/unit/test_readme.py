"""The README's configuration table is the output of `supervisor-service settings --markdown`."""

from pathlib import Path

from supervisor_service.app.settings import settings_table_markdown


def test_readme_configuration_table_is_current():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert settings_table_markdown() in readme, (
        "README.md's configuration table is stale: paste `supervisor-service settings --markdown`"
    )
