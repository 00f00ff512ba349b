"""AGI transport: the session with Asterisk and the names of the channel variables we set."""
