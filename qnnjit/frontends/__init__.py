"""Frontends lower source models into the qnnjit IR; they know nothing of backends."""
