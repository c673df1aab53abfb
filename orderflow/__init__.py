"""orderflow: a PostgreSQL-centric order-fulfillment saga service.

One namespace for the whole product.  The design card's folders stay at the top
of the checkout (`app/`, `statemachine/`, `outbox_worker/`, `sql/`, `alembic/`)
with `services/`, `dashboard/` and `sandbox/` beside them; each is a link in this
folder (`orderflow/app -> ../app`, `orderflow/migrations -> ../alembic`, …), so a
checkout, an editable install, mypy and pytest all import `orderflow.app…`, and a
wheel installs one top-level name, `orderflow`.  The modules here are the floor
below everything: settings, failpoints and metrics.
"""
