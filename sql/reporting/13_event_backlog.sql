CREATE OR REPLACE VIEW reporting.event_backlog AS
SELECT b.pending,
       b.oldest_pending_at,
       now() - b.oldest_pending_at AS oldest_pending_age,
       r.published_last_hour,
       r.last_published_at,
       r.p50_lag_last_hour,
       r.max_lag_last_hour
  FROM (SELECT count(*) AS pending, min(e.time) AS oldest_pending_at
          FROM public.order_events e
         WHERE e.published_at IS NULL) b
 CROSS JOIN (
       SELECT count(*) FILTER (WHERE e.published_at IS NOT NULL) AS published_last_hour,
              max(e.published_at) AS last_published_at,
              percentile_cont(0.5) WITHIN GROUP (ORDER BY e.published_at - e.time)
                  FILTER (WHERE e.published_at IS NOT NULL) AS p50_lag_last_hour,
              max(e.published_at - e.time) AS max_lag_last_hour
         FROM public.order_events e
        WHERE e.time > now() - interval '1 hour') r;

COMMENT ON VIEW reporting.event_backlog IS
  'The order events relay''s lag: events not yet published to the broker (with ORDERFLOW_EVENTS_URL unset they are all pending: the feed GET /v1/events serves them instead) and how long the oldest has waited; the last hour''s published count and event-to-publish lag.';
