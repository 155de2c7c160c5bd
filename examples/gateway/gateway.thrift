// The gateway service of `meshkit demo` and examples/gateway: its one method calls echo,
// so every call crosses two services.
namespace py gateway

service Gateway {
  // Greet `name`: the greeting is made by calling echo.echo through discovery.
  string greet(1: string name)
}
