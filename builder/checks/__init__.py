"""Judgements: facts gathered elsewhere in, checks and differences out. Pure."""
