"""The Storage SCP: makes every received instance durable in the spool, then enqueues it."""
