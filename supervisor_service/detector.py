"""The scalar reference detector at the import path the contract gives it (docs/design.md §2).

It lives in `supervisor_service.core.detector`; this module only names it here.
"""

from supervisor_service.core.detector import PhiAccrualFailureDetector, PhiAccrualOptions

__all__ = ["PhiAccrualFailureDetector", "PhiAccrualOptions"]
