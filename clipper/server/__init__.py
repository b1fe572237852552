"""The query servers: the msgpack TCP port (query_server) and REST (rest), one base (_connection)."""
