"""The HTTP gateway: validates requests, forwards them to the broker, stores and serves images."""
