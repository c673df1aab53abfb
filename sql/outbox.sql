-- claim_outbox --
-- Claim up to n ready rows (in flight with an expired lease, then pending and due; two index-ordered reads): lease them, bump the fence; with each, what its step needs to know about the order (state, money, address, lines, payment and shipment references)
WITH expired AS (
    -- Leases left by a dead worker first (few, and due longest); each read walks
    -- its own partial index in order and stops at its LIMIT, so a claim costs
    -- the same with 10 or 100,000 ready rows.
    SELECT id
      FROM outbox
     WHERE status = 'in_flight' AND lease_until < now()
     ORDER BY lease_until
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
), due AS (
    SELECT id
      FROM outbox
     WHERE status = 'pending' AND available_at <= now()
     ORDER BY available_at, id
     LIMIT greatest(%(limit)s - (SELECT count(*) FROM expired), 0)
       FOR UPDATE SKIP LOCKED
), ready AS (
    SELECT id FROM expired
    UNION ALL
    SELECT id FROM due
), claimed AS (
    UPDATE outbox o
       SET status = 'in_flight',
           lease_owner = %(owner)s,
           lease_until = now() + make_interval(secs => %(lease_s)s),
           fence = o.fence + 1,
           attempts = o.attempts + 1,
           claimed_at = COALESCE(o.claimed_at, clock_timestamp())
     WHERE o.id = ANY (ARRAY(SELECT id FROM ready))  -- by primary key, never a scan
    RETURNING o.id, o.order_id, o.step, o.idempotency_key, o.fence, o.attempts, o.payload
)
SELECT c.*,
       json_build_object(
           'id', ord.id, 'state', ord.state, 'total_cents', ord.total_cents,
           'currency', ord.currency, 'payment_method_id', ord.payment_method_id,
           'payment_mandate', ord.payment_mandate,
           'shipping_address', ord.shipping_address, 'email', ord.email,
           'lines', COALESCE(
               (SELECT json_agg(json_build_object('sku', l.sku, 'qty', l.qty) ORDER BY l.sku)
                  FROM order_lines l WHERE l.order_id = ord.id),
               '[]'::json),
           'created_epoch', floor(extract(epoch FROM ord.created_at))::bigint,
           'payment_intent_id', COALESCE(pi.id, pay.provider_ref),
           'intent_status', pi.status,
           'captured_cents', pay.amount_cents,
           'shipment_id', shp.carrier_ref,
           'tracking_number', shp.tracking_number
       ) AS context
  FROM claimed c
  JOIN orders ord ON ord.id = c.order_id
  -- Each reference is looked up per claimed row (LATERAL ... LIMIT 1 is never
  -- flattened into a join): a join planned on statistics from when the table was
  -- small hashed or materialized all of it on every claim, a cost that grew with
  -- the table (70 ms a claim at 1,900 payments before autovacuum's first ANALYZE).
  LEFT JOIN LATERAL (
      SELECT p.id, p.status FROM payment_intents p WHERE p.order_id = c.order_id LIMIT 1
  ) pi ON true
  LEFT JOIN LATERAL (
      SELECT p.provider_ref, p.amount_cents FROM payments p
       WHERE p.order_id = c.order_id AND p.kind = 'charge' AND p.status = 'succeeded'
       LIMIT 1
  ) pay ON true
  LEFT JOIN LATERAL (
      SELECT s.carrier_ref, s.tracking_number FROM shipments s
       WHERE s.order_id = c.order_id AND s.kind = 'outbound'
       LIMIT 1
  ) shp ON true
 ORDER BY c.id;

-- checkpoint_outbox_row --
-- Durably note what a step learned mid-call (a PaymentIntent's id, a new key) before its next call; with states, only while the order is in one of them (its row share-locked until commit, so an expiry waits for us and then sees the note); says whether the lease and the state held
WITH ord AS (
    SELECT id FROM orders
     WHERE id = %(order_id)s
       AND (%(states)s::text[] IS NULL OR state = ANY(%(states)s::text[]))
       FOR SHARE
), leased AS (
    SELECT id FROM outbox
     WHERE id = %(id)s AND status = 'in_flight' AND lease_owner = %(owner)s AND fence = %(fence)s
), saved AS (
    UPDATE outbox o
       SET payload = o.payload || %(memory)s
      FROM leased, ord
     WHERE o.id = leased.id
 RETURNING o.id
)
SELECT EXISTS (SELECT 1 FROM leased) AS leased,
       EXISTS (SELECT 1 FROM ord) AS in_state,
       EXISTS (SELECT 1 FROM saved) AS saved;

-- retry_outbox_row --
-- Put a claimed row back to pending after a transient failure, due after the backoff
UPDATE outbox
   SET status = 'pending', lease_owner = NULL, lease_until = NULL,
       available_at = now() + make_interval(secs => %(delay_s)s), last_error = %(error)s,
       payload = payload || %(payload)s,
       attempts = attempts - CASE WHEN %(give_back_attempt)s THEN 1 ELSE 0 END
 WHERE id = %(id)s AND status = 'in_flight' AND lease_owner = %(owner)s AND fence = %(fence)s
RETURNING id;

-- dead_outbox_row --
-- Dead-letter a claimed row: it waits for an operator (what the step learned stays in its payload)
UPDATE outbox
   SET status = 'dead', lease_owner = NULL, lease_until = NULL, last_error = %(error)s,
       payload = payload || %(payload)s
 WHERE id = %(id)s AND status = 'in_flight' AND lease_owner = %(owner)s AND fence = %(fence)s
RETURNING id;

-- release_outbox_rows --
-- On shutdown: give our unfinished rows back at once (the attempt does not count, but its call may still have reached the provider: its outcome is unknown)
UPDATE outbox
   SET status = 'pending', lease_owner = NULL, lease_until = NULL, available_at = now(),
       attempts = GREATEST(attempts - 1, 0),
       payload = payload || '{"unsettled": true}'
 WHERE id = ANY(%(ids)s) AND status = 'in_flight' AND lease_owner = %(owner)s
RETURNING id;

-- extend_leases --
-- Heartbeat: keep our in-flight rows leased while their calls run; a row locked right now is skipped (a commit is finishing it, or its next heartbeat comes in lease_s / 3), so the heartbeat never queues behind the committers, nor they behind it
WITH mine AS (
    SELECT id FROM outbox
     WHERE id = ANY(%(ids)s) AND status = 'in_flight' AND lease_owner = %(owner)s
       FOR UPDATE SKIP LOCKED
)
UPDATE outbox o
   SET lease_until = now() + make_interval(secs => %(lease_s)s)
  FROM mine
 WHERE o.id = mine.id
RETURNING o.id;

-- redrive_outbox_row --
-- Operator: a dead row goes back to pending with a fresh attempt budget (what it learned, keys and unknown outcomes included, stays)
UPDATE outbox
   SET status = 'pending', attempts = 0, available_at = now(), lease_owner = NULL,
       lease_until = NULL,
       payload = (payload - 'not_done' - 'unknowns' - 'crashes' - 'throttled' - 'polls')
                 || '{"last_attempt": 0}'
 WHERE id = %(id)s AND status = 'dead'
RETURNING id, order_id, step;

-- list_outbox --
-- Outbox rows for operators, newest first, optionally only dead ones
SELECT id, order_id, step, status, attempts, available_at, lease_owner, last_error, created_at
  FROM outbox
 WHERE (NOT %(dead_only)s OR status = 'dead')
   AND (%(include_done)s OR status <> 'done')
 ORDER BY id DESC
 LIMIT %(limit)s;

-- expired_reservations --
-- Orders still waiting for their payment whose reservation has expired (locked, skipping ones being worked on)
SELECT o.id
  FROM reservations r
  JOIN orders o ON o.id = r.order_id
 WHERE r.expires_at < now() AND r.consumed_at IS NULL AND r.released_at IS NULL
   AND o.state IN ('reserved', 'awaiting_payment')
 ORDER BY r.expires_at
 LIMIT %(limit)s
   FOR UPDATE OF o SKIP LOCKED;

-- holds_near_expiry --
-- Orders still going forward whose card hold must be captured within the margin (Stripe's capture_before, else 7 days from the hold), soonest first, after a keyset cursor (locked, skipping ones being worked on)
SELECT o.id, o.state, d.capture_before
  FROM payment_intents pi
  JOIN orders o ON o.id = pi.order_id
 CROSS JOIN LATERAL (
       SELECT COALESCE(pi.capture_before, pi.held_at + interval '7 days') AS capture_before) d
 WHERE pi.status = 'requires_capture'
   AND o.state IN ('paid', 'shipped')
   AND d.capture_before <= now() + make_interval(secs => %(margin_s)s)
   AND (d.capture_before, o.id) > (%(after_before)s::timestamptz, %(after_id)s::text)
 ORDER BY d.capture_before, o.id
 LIMIT %(limit)s
   FOR UPDATE OF o SKIP LOCKED;

-- hurry_capture --
-- Make a shipped order's pending capture due now, once (its hold is close to expiry; afterwards its own backoff holds)
UPDATE outbox
   SET available_at = now(), payload = payload || '{"hurried": true}'::jsonb
 WHERE order_id = %(order_id)s AND step = 'capture_payment' AND status = 'pending'
   AND available_at > now() AND NOT payload ? 'hurried'
RETURNING id;

-- purge_idempotency_keys --
-- Forget idempotency keys older than the retention, never one in use (bounded batch)
DELETE FROM idempotency_keys
 WHERE id IN (SELECT id FROM idempotency_keys
               WHERE created_at < now() - make_interval(hours => %(hours)s)
                 -- a key locked by a request (or by one that died an hour ago or less) stays
                 AND (locked_at IS NULL OR locked_at < now() - interval '1 hour')
               ORDER BY id LIMIT %(limit)s
                 FOR UPDATE SKIP LOCKED);

-- purge_done_outbox --
-- Delete done outbox rows older than the retention (bounded batch)
DELETE FROM outbox
 WHERE id IN (SELECT id FROM outbox
               WHERE status = 'done' AND done_at < now() - make_interval(days => %(days)s)
               ORDER BY done_at LIMIT %(limit)s);

-- insert_payment --
-- Record a charge or refund outcome (the unique index allows one success of each kind)
INSERT INTO payments (order_id, kind, status, provider_ref, amount_cents, currency,
                      idempotency_key, failure_code)
VALUES (%(order_id)s, %(kind)s, %(status)s, %(provider_ref)s, %(amount_cents)s, %(currency)s,
        %(idempotency_key)s, %(failure_code)s)
ON CONFLICT (order_id, kind) WHERE status = 'succeeded' DO NOTHING
RETURNING id;

-- cancel_shipment_row --
-- Record that the outbound shipment was cancelled
UPDATE shipments
   SET status = 'cancelled', cancelled_at = now()
 WHERE order_id = %(order_id)s AND kind = 'outbound' AND status = 'created'
RETURNING id;

-- outbox_row --
-- One outbox row by id
SELECT id, order_id, step, status, attempts, last_error FROM outbox WHERE id = %(id)s;

-- listen_outbox --
-- Wake-ups: every transaction that writes outbox rows NOTIFYs this channel
LISTEN orderflow_outbox;

-- open_outbox_rows --
-- How many outbox rows are still to be worked (pending or in flight)
SELECT count(*) AS n FROM outbox WHERE status IN ('pending', 'in_flight');

-- finish_outbox_rows --
-- Mark claimed rows done, each only if our lease on it still holds (owner and fence)
UPDATE outbox o
   SET status = 'done', done_at = now(), lease_owner = NULL, lease_until = NULL,
       last_error = f.note
  FROM jsonb_to_recordset(%(rows)s) AS f(id bigint, fence bigint, note text)
 WHERE o.id = f.id AND o.fence = f.fence AND o.status = 'in_flight'
   AND o.lease_owner = %(owner)s
RETURNING o.id;

-- insert_shipments --
-- Record outbound shipments or return labels, one per order and kind (a replay inserts nothing)
INSERT INTO shipments (order_id, kind, carrier_ref, tracking_number, label_url, idempotency_key)
SELECT s.order_id, s.kind, s.carrier_ref, s.tracking_number, s.label_url, s.idempotency_key
  FROM jsonb_to_recordset(%(shipments)s)
       AS s(order_id text, kind text, carrier_ref text, tracking_number text, label_url text,
            idempotency_key text)
ON CONFLICT (order_id, kind) DO NOTHING;
