CREATE OR REPLACE VIEW reporting.state_durations AS
WITH spans AS (
    SELECT h.to_state AS state,
           EXTRACT(EPOCH FROM lead(h.at) OVER (PARTITION BY h.order_id ORDER BY h.id) - h.at)
               AS seconds
      FROM public.order_history h
)
SELECT state,
       count(*) AS stays,
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY seconds)::numeric, 3) AS p50_seconds,
       round(percentile_cont(0.95) WITHIN GROUP (ORDER BY seconds)::numeric, 3) AS p95_seconds,
       round(max(seconds)::numeric, 3) AS max_seconds
  FROM spans
 WHERE seconds IS NOT NULL
 GROUP BY state
 ORDER BY state;

COMMENT ON VIEW reporting.state_durations IS
  'Per state: how long orders stayed in it before their next recorded change (p50, p95, max, in seconds), from order_history; stays still open are not counted.';
