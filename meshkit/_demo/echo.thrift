// The echo service used by the examples, the demo and the benchmarks.
namespace py echo

exception EchoError {
  1: string reason
}

service Echo {
  // Return the message unchanged.
  string echo(1: string message)

  // Return the message reversed; fails with EchoError on an empty message.
  string reverse(1: string message) throws (1: EchoError error)

  // Sleep on the server (ms) and return how long it slept: for deadline demos.
  i32 slow(1: i32 delay_ms)

  // Fire and forget.
  oneway void ping()
}
