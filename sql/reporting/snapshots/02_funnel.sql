DROP VIEW IF EXISTS reporting.funnel;

CREATE MATERIALIZED VIEW reporting.funnel AS
SELECT snapshot.*, now() AS as_of
  FROM (
    WITH reached AS (
        SELECT o.id,
               (o.created_at AT TIME ZONE 'UTC')::date AS day,
               bool_or(h.to_state = 'paid') AS paid,
               bool_or(h.to_state = 'shipped') AS shipped,
               bool_or(h.to_state = 'confirmed') AS confirmed,
               bool_or(h.to_state = 'cancelled') AS cancelled
          FROM public.orders o
          JOIN public.order_history h ON h.order_id = o.id
         GROUP BY o.id, o.created_at
    )
    SELECT day,
           count(*) AS placed,
           count(*) FILTER (WHERE paid) AS paid,
           count(*) FILTER (WHERE shipped) AS shipped,
           count(*) FILTER (WHERE confirmed) AS confirmed,
           count(*) FILTER (WHERE cancelled) AS cancelled,
           round(count(*) FILTER (WHERE paid)::numeric / count(*), 4) AS paid_rate,
           round(count(*) FILTER (WHERE shipped)::numeric / count(*), 4) AS shipped_rate,
           round(count(*) FILTER (WHERE confirmed)::numeric / count(*), 4) AS confirmed_rate,
           round(count(*) FILTER (WHERE cancelled)::numeric / count(*), 4) AS cancelled_rate
      FROM reached
     GROUP BY day
     ORDER BY day DESC
) AS snapshot
WITH DATA;

CREATE UNIQUE INDEX funnel_key ON reporting.funnel (day);

COMMENT ON MATERIALIZED VIEW reporting.funnel IS
  'Per day of placement (UTC): orders placed, and how many of them ever reached paid, shipped, confirmed and cancelled, with each as a share of placed. A snapshot: the worker refreshes it every ORDERFLOW_REPORT_REFRESH_S seconds (60); as_of says when.';
