"""The query server: the msgpack TCP port (and, later, REST)."""
