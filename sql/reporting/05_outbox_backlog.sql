CREATE OR REPLACE VIEW reporting.outbox_backlog AS
SELECT step,
       count(*) FILTER (WHERE status = 'pending') AS pending,
       count(*) FILTER (WHERE status = 'in_flight') AS in_flight,
       count(*) FILTER (WHERE status = 'dead') AS dead,
       now() - min(created_at) FILTER (WHERE status IN ('pending', 'in_flight')) AS oldest_open_age,
       now() - min(created_at) FILTER (WHERE status = 'dead') AS oldest_dead_age
  FROM public.outbox
 WHERE status <> 'done'
 GROUP BY step
 ORDER BY step;

COMMENT ON VIEW reporting.outbox_backlog IS
  'Per step: outbox rows pending, in flight and dead, and the age of the oldest open and oldest dead row. Steps with nothing open do not appear.';
