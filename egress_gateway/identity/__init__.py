"""Who is behind a connection: adapters that turn a source address (and credentials) into an `Identity`."""
