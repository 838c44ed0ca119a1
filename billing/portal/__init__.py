"""What an end user's own page reads about their usage and budgets (`llmgateway.portal` shows it)."""
