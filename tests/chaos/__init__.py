"""The seeded chaos suite (`make chaos`): see tests/chaos/__main__.py and README "Chaos testing"."""
