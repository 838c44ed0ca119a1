"""Conversations on the web chat page, saved per user (models, services, selectors, admin)."""
