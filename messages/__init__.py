"""Code that both the ServerApp and the ClientApp use to read and write message contents."""

# It may import flwr and mstkd, never client or server: the ServerApp must not import the ClientApp's package.
