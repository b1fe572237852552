"""Container RPC: ZeroMQ between the frontend and model containers."""
