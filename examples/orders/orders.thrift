// The orders example: an RPC service that announces each order on Kafka.
namespace py orders

exception InvalidOrder {
  1: string message
}

service Orders {
  // Place an order; returns its id once the broker has the orders.created message.
  string place(1: string customer, 2: i64 amount_cents) throws (1: InvalidOrder invalid)
}
