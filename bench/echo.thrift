// Echo service used by bench/rpc.py (a copy of examples/echo/echo.thrift).
service Echo {
    string echo(1: string message)
}
