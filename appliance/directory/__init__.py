"""The user directory: who the organisation's users are, their addresses, mailboxes and passwords."""
