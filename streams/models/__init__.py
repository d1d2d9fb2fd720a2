"""Model lifecycle in the service: watching the registry for hot reloads, and shadow scoring."""
