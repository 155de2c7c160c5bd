"""The services of ``meshkit demo``, shipped inside the package with their IDLs.

See :mod:`meshkit._demo.services` and :mod:`meshkit.demo`.
"""

from pathlib import Path

IDL_DIR = Path(__file__).resolve().parent
ECHO_IDL = IDL_DIR / "echo.thrift"
GATEWAY_IDL = IDL_DIR / "gateway.thrift"

__all__ = ["ECHO_IDL", "GATEWAY_IDL", "IDL_DIR"]
