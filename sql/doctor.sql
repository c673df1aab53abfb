-- doctor_double_charges --
-- Orders with more than one captured payment
SELECT order_id FROM payments
 WHERE kind = 'charge' AND status = 'succeeded'
 GROUP BY order_id HAVING count(*) > 1;

-- doctor_kept_money --
-- Settled orders whose captured payment was neither shipped nor refunded, nor is being refunded (a late capture's refund may still be running)
SELECT o.id AS order_id
  FROM orders o
  JOIN payments c ON c.order_id = o.id AND c.kind = 'charge' AND c.status = 'succeeded'
 WHERE o.state IN ('cancelled', 'returned')
   AND NOT EXISTS (SELECT 1 FROM payments r
                    WHERE r.order_id = o.id AND r.kind = 'refund' AND r.status = 'succeeded')
   AND NOT EXISTS (SELECT 1 FROM outbox ob
                    WHERE ob.order_id = o.id AND ob.step IN ('refund_payment', 'refund_return')
                      AND ob.status IN ('pending', 'in_flight'));

-- doctor_stock --
-- SKUs where stock is not conserved: initial = available + live reservations + sold - restocked, and available = the ledger's sum
WITH lines AS (
    SELECT l.sku,
           sum(l.qty) FILTER (WHERE r.consumed_at IS NULL AND r.released_at IS NULL) AS live,
           sum(l.qty) FILTER (WHERE r.consumed_at IS NOT NULL AND r.released_at IS NULL) AS sold
      FROM order_lines l JOIN reservations r USING (order_id)
     GROUP BY l.sku
), ledger AS (
    SELECT sku,
           sum(delta) AS balance,
           sum(delta) FILTER (WHERE kind IN ('load', 'adjust')) AS initial,
           sum(delta) FILTER (WHERE kind = 'restock') AS restocked
      FROM stock_ledger GROUP BY sku
)
SELECT p.sku, p.available, COALESCE(g.balance, 0) AS ledger_balance,
       COALESCE(g.initial, 0) AS initial, COALESCE(l.live, 0) AS live,
       COALESCE(l.sold, 0) AS sold, COALESCE(g.restocked, 0) AS restocked
  FROM products p
  LEFT JOIN lines l USING (sku)
  LEFT JOIN ledger g USING (sku)
 WHERE p.available <> COALESCE(g.balance, 0)
    OR COALESCE(g.initial, 0)
       <> p.available + COALESCE(l.live, 0) + COALESCE(l.sold, 0) - COALESCE(g.restocked, 0);

-- doctor_duplicate_keys --
-- More than one order for one (user, idempotency key)
SELECT user_id, idempotency_key FROM orders
 GROUP BY user_id, idempotency_key HAVING count(*) > 1;

-- doctor_bad_edges --
-- History rows that are not an edge of the machine, or do not continue from the previous row
SELECT order_id, id, from_state, event, to_state
  FROM (SELECT h.*, lag(h.to_state) OVER (PARTITION BY h.order_id ORDER BY h.id) AS previous
          FROM order_history h) h
 WHERE (h.from_state IS DISTINCT FROM h.previous)
    OR NOT EXISTS (
        SELECT 1 FROM unnest(%(sources)s::text[], %(events)s::text[], %(dests)s::text[])
                        AS e(source, event, dest)
         WHERE e.source IS NOT DISTINCT FROM h.from_state
           AND e.event = h.event AND e.dest = h.to_state);

-- doctor_compensation_sequences --
-- Orders that ran more than one compensation: their history events in order
SELECT order_id, array_agg(event ORDER BY id) AS events,
       array_agg(COALESCE(detail ->> 'step', '') ORDER BY id) AS steps
  FROM order_history
 WHERE order_id IN (SELECT order_id FROM order_history WHERE event = 'compensation_done'
                     GROUP BY order_id HAVING count(*) > 1)
 GROUP BY order_id;

-- doctor_stuck --
-- Working orders past their state's timeout
SELECT order_id, state, in_state_for FROM reporting.stuck_orders;

-- doctor_payment_charges --
-- Captured charges recorded per order, to compare with the provider's effects
SELECT order_id, count(*) AS n FROM payments
 WHERE kind = 'charge' AND status = 'succeeded'
 GROUP BY order_id;

-- doctor_charges_in_flight --
-- Orders whose payment is still being settled (a charge, a 3-D Secure or bank debit, a compensation that may find a capture): the provider may know more than we do yet
SELECT order_id FROM outbox
 WHERE step IN ('charge_payment', 'await_payment', 'capture_payment', 'refund_payment')
   AND status IN ('pending', 'in_flight');

-- doctor_settled_orders --
-- Orders that are cancelled or returned: no money may stay with us
SELECT id AS order_id, state FROM orders WHERE state IN ('cancelled', 'returned');

-- doctor_refunds_open --
-- Orders whose refund is still being worked on (the provider may not show it yet)
SELECT order_id FROM outbox
 WHERE step IN ('refund_payment', 'refund_return') AND status IN ('pending', 'in_flight');

-- doctor_cancelled_holds --
-- Cancelled orders whose card payment is still held at Stripe as we last saw it (the customer's funds kept), unless its release is still being worked on
SELECT o.id AS order_id
  FROM orders o
  JOIN payment_intents pi ON pi.order_id = o.id
 WHERE o.state = 'cancelled' AND pi.status = 'requires_capture'
   AND NOT EXISTS (SELECT 1 FROM outbox ob
                    WHERE ob.order_id = o.id AND ob.step = 'refund_payment'
                      AND ob.status IN ('pending', 'in_flight'));

-- doctor_confirmed_holds --
-- Confirmed orders whose payment is still only held: shipped, told, and the money never taken
SELECT o.id AS order_id
  FROM orders o
  JOIN payment_intents pi ON pi.order_id = o.id
 WHERE o.state = 'confirmed' AND pi.status = 'requires_capture';

-- doctor_events_match_history --
-- History rows (since the oldest event kept) without their event, and events without their history row or of another state
SELECT h.order_id, h.id AS history_id, 'no event' AS problem
  FROM order_history h
 WHERE h.id >= (SELECT min(history_id) FROM order_events)
   AND NOT EXISTS (SELECT 1 FROM order_events e WHERE e.history_id = h.id)
UNION ALL
SELECT e.order_id, e.history_id,
       CASE WHEN h.id IS NULL THEN 'no history row' ELSE 'type ' || e.type END
  FROM order_events e
  LEFT JOIN order_history h ON h.id = e.history_id
 WHERE h.id IS NULL
    OR e.type <> 'orderflow.order.'
                 || CASE WHEN h.from_state IS NULL THEN 'created' ELSE h.to_state END;
