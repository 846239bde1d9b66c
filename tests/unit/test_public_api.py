"""The names other programs import: the top-level API and the reference detector's contract path."""

from __future__ import annotations

import subprocess
import sys

import supervisor_service
from supervisor_service import core


def test_the_contract_path_of_the_reference_detector_is_the_core_one():
    from supervisor_service.detector import PhiAccrualFailureDetector, PhiAccrualOptions

    assert PhiAccrualFailureDetector is core.PhiAccrualFailureDetector
    assert PhiAccrualOptions is core.PhiAccrualOptions
    fd = PhiAccrualFailureDetector(PhiAccrualOptions(threshold=8.0, min_std_deviation_ms=100,
                                                     acceptable_heartbeat_pause_ms=10_000, max_sample_size=1000))
    fd.heartbeat(1_000)
    fd.heartbeat(2_000)
    assert fd.is_available(2_500) and not fd.is_available(60_000)


def test_every_public_name_resolves():
    for name in supervisor_service.__all__:
        assert getattr(supervisor_service, name) is not None, name
    assert sorted(supervisor_service.__all__) == supervisor_service.__all__


def test_an_unknown_name_is_an_attribute_error():
    try:
        supervisor_service.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("an unknown name resolved")


def test_the_contract_path_loads_no_grpc():
    code = ("import sys; from supervisor_service.detector import PhiAccrualFailureDetector; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'grpc', 'google', 'pydantic', 'prometheus_client'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
