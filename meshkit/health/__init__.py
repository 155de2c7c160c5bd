"""Health, metrics and info endpoint served by every meshkit process.

See DESIGN.md section 2: ``/health/live``, ``/health/ready``, ``/metrics``, ``/info``.
"""

from .loopmon import LAG_METRIC, LoopMonitor
from .server import HealthServer
from .state import CheckResult, HealthState, Phase, ReadinessCheck

__all__ = [
    "LAG_METRIC",
    "CheckResult",
    "HealthServer",
    "HealthState",
    "LoopMonitor",
    "Phase",
    "ReadinessCheck",
]
