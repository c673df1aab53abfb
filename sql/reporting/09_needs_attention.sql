CREATE OR REPLACE VIEW reporting.needs_attention AS
SELECT o.id AS order_id,
       o.user_id,
       o.total_cents,
       o.currency,
       o.updated_at,
       now() - o.updated_at AS waiting_for,
       d.id AS outbox_id,
       d.step,
       d.last_error
  FROM public.orders o
  LEFT JOIN LATERAL (
        SELECT id, step, last_error
          FROM public.outbox
         WHERE order_id = o.id AND status = 'dead'
         ORDER BY id DESC
         LIMIT 1) d ON true
 WHERE o.state = 'needs_attention'
 ORDER BY o.updated_at;

COMMENT ON VIEW reporting.needs_attention IS
  'Orders parked in needs_attention, longest waiting first, with the dead outbox row that parked them (re-driving it resumes the order).';
