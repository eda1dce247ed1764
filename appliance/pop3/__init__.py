"""POP3 on the shared Maildir."""
