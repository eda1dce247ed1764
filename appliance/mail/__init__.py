"""Mail: the SMTP server, relay policy, the durable queue and local delivery."""
