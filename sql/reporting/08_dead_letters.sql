CREATE OR REPLACE VIEW reporting.dead_letters AS
SELECT ob.id AS outbox_id,
       ob.order_id,
       o.state AS order_state,
       ob.step,
       ob.attempts,
       ob.last_error,
       ob.created_at,
       now() - ob.created_at AS since_written
  FROM public.outbox ob
  JOIN public.orders o ON o.id = ob.order_id
 WHERE ob.status = 'dead'
 ORDER BY ob.id;

COMMENT ON VIEW reporting.dead_letters IS
  'Outbox rows that used up their attempts (status dead), oldest first, with their order''s state: what an operator fixes and then re-drives (orderflow outbox retry ID, or the dashboard).';
