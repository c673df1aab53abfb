DROP VIEW IF EXISTS reporting.daily_sales;

CREATE MATERIALIZED VIEW reporting.daily_sales AS
SELECT snapshot.*, now() AS as_of
  FROM (
    SELECT (o.created_at AT TIME ZONE 'UTC')::date AS day,
           o.currency,
           count(*) AS orders,
           count(c.id) AS paid_orders,
           COALESCE(sum(c.amount_cents), 0)::bigint AS gross_cents,
           COALESCE(sum(r.amount_cents), 0)::bigint AS refunded_cents,
           (COALESCE(sum(c.amount_cents), 0) - COALESCE(sum(r.amount_cents), 0))::bigint AS net_cents
      FROM public.orders o
      LEFT JOIN public.payments c
             ON c.order_id = o.id AND c.kind = 'charge' AND c.status = 'succeeded'
      LEFT JOIN public.payments r
             ON r.order_id = o.id AND r.kind = 'refund' AND r.status = 'succeeded'
     GROUP BY 1, 2
     ORDER BY 1 DESC, 2
) AS snapshot
WITH DATA;

CREATE UNIQUE INDEX daily_sales_key ON reporting.daily_sales (day, currency);

COMMENT ON MATERIALIZED VIEW reporting.daily_sales IS
  'Per day of placement (UTC) and currency: orders, paid orders, gross captured, refunded and net, in cents. A snapshot: the worker refreshes it every ORDERFLOW_REPORT_REFRESH_S seconds (60); as_of says when.';
