"""The chat feature: routes, schemas, use cases, quota, prompts, idempotency."""
