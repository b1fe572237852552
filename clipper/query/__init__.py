"""The query processor and model queues."""
