-- relay_try_lead --
-- Become the one relay that publishes (a session lock: it goes with the connection, so a killed relay's successor takes over at once)
SELECT pg_try_advisory_lock(hashtext('orderflow.events.relay')) AS leading;

-- unpublished_events --
-- The oldest events not yet published, as CloudEvents envelopes, with what the relay orders them by (each order's sequence)
SELECT e.position, e.id, e.order_id, e.sequence, e.type, e.time,
       json_build_object(
           'specversion', '1.0', 'id', e.id, 'source', '/orderflow/orders', 'type', e.type,
           'subject', e.order_id, 'time', e.time, 'datacontenttype', 'application/json',
           'data', e.data)::text AS envelope
  FROM order_events e
 WHERE e.published_at IS NULL
 ORDER BY e.position
 LIMIT %(limit)s;

-- mark_events_published --
-- Record that the broker acknowledged these events (a second relay's mark changes nothing)
UPDATE order_events
   SET published_at = now()
 WHERE position = ANY(%(positions)s::bigint[]) AND published_at IS NULL;

-- event_feed --
-- The feed after a cursor, oldest first: only events of transactions older than every one still running, so a late commit never lands behind a cursor already served
SELECT e.txid, e.position,
       json_build_object(
           'specversion', '1.0', 'id', e.id, 'source', '/orderflow/orders', 'type', e.type,
           'subject', e.order_id, 'time', e.time, 'datacontenttype', 'application/json',
           'data', e.data) AS envelope
  FROM order_events e
 WHERE (e.txid, e.position) > (%(after_txid)s::bigint, %(after_position)s::bigint)
   AND e.txid < pg_snapshot_xmin(pg_current_snapshot())::text::bigint
 ORDER BY e.txid, e.position
 LIMIT %(limit)s;

-- event_feed_snapshot --
-- First statement of a feed read: the purge mark and the page from one snapshot
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY;

-- event_feed_purged --
-- How far the retention purge has gone (a cursor before it may have missed events)
SELECT txid, position FROM order_events_purged;

-- purge_events --
-- Delete events older than the retention (only published ones while a relay publishes), oldest first in a bounded batch, and move the purge mark past them
WITH doomed AS (
    SELECT e.position, e.txid
      FROM order_events e
     WHERE e.time < now() - make_interval(hours => %(hours)s)
       AND (NOT %(published_only)s OR e.published_at IS NOT NULL)
     ORDER BY e.time
     LIMIT %(limit)s
), deleted AS (
    DELETE FROM order_events e USING doomed d
     WHERE e.position = d.position
 RETURNING e.txid, e.position
), last AS (
    SELECT txid, position FROM deleted ORDER BY txid DESC, position DESC LIMIT 1
), marked AS (
    INSERT INTO order_events_purged (singleton, txid, position, purged_at)
    SELECT 1, txid, position, now() FROM last
        ON CONFLICT (singleton) DO UPDATE
       SET (txid, position, purged_at) = (EXCLUDED.txid, EXCLUDED.position, now())
     WHERE (order_events_purged.txid, order_events_purged.position)
           < (EXCLUDED.txid, EXCLUDED.position)
)
SELECT count(*) AS purged FROM deleted;

-- event_counts_by_type --
-- How many events of each type are kept (the demo's tally)
SELECT type, count(*) AS n FROM order_events GROUP BY type ORDER BY type;

-- metrics_events --
-- Events not yet published and the age of the oldest, for the metrics gauges (reporting.event_backlog)
SELECT pending, COALESCE(extract(epoch FROM oldest_pending_age), 0)::float8 AS oldest_s
  FROM reporting.event_backlog;

-- listen_events --
-- Wake the relay when events are written (the history trigger NOTIFYs this channel)
LISTEN orderflow_events;
