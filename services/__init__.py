"""Application services: the order create path, idempotency, the catalog, payments
as Stripe reports them, reconciliation and the invariants' doctor."""
