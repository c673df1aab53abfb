DROP VIEW IF EXISTS reporting.state_durations;

CREATE MATERIALIZED VIEW reporting.state_durations AS
SELECT snapshot.*, now() AS as_of
  FROM (
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
     ORDER BY state
) AS snapshot
WITH DATA;

CREATE UNIQUE INDEX state_durations_key ON reporting.state_durations (state);

COMMENT ON MATERIALIZED VIEW reporting.state_durations IS
  'Per state: how long orders stayed in it before their next recorded change (p50, p95, max, in seconds), from order_history; stays still open are not counted. A snapshot: the worker refreshes it every ORDERFLOW_REPORT_REFRESH_S seconds (60); as_of says when.';
