-- insert_idempotency_key --
-- Phase 1 for a new key: record the request and lock the key; nothing if the key exists, or if an order was made with this key (its key row purged since): that order comes back in made
WITH made AS (
    SELECT id, cart_id, payment_method_id, payment_mandate
      FROM orders
     WHERE user_id = %(user_id)s AND idempotency_key = %(key)s
), inserted AS (
    INSERT INTO idempotency_keys (user_id, key, request_method, request_path, request_hash,
                                  locked_at)
    SELECT %(user_id)s, %(key)s, %(method)s, %(path)s, %(request_hash)s, clock_timestamp()
     WHERE NOT EXISTS (SELECT 1 FROM made)
    ON CONFLICT (user_id, key) DO NOTHING
 RETURNING id, locked_at
)
SELECT (SELECT id FROM inserted) AS id,
       (SELECT locked_at FROM inserted) AS locked_at,
       (SELECT row_to_json(made) FROM made) AS made;

-- lock_idempotency_key --
-- Phase 1 for a known key: read it under a row lock to decide replay, conflict or retry
SELECT id, request_method, request_path, request_hash, recovery_point, locked_at,
       response_status, response_body,
       locked_at IS NOT NULL
           AND locked_at > clock_timestamp() - make_interval(secs => %(lock_timeout_s)s) AS in_flight
  FROM idempotency_keys
 WHERE user_id = %(user_id)s AND key = %(key)s
   FOR UPDATE;

-- relock_idempotency_key --
-- Phase 1 retry: take the lock of a key whose earlier attempt failed before finishing
UPDATE idempotency_keys
   SET locked_at = clock_timestamp(), last_run_at = clock_timestamp()
 WHERE id = %(id)s AND recovery_point <> 'finished'
RETURNING id, locked_at;

-- finish_idempotency_key --
-- Phase 2: store the answer and unlock, only if the lock is still ours
UPDATE idempotency_keys
   SET recovery_point = 'finished', response_status = %(status)s, response_body = %(body)s,
       order_id = %(order_id)s, locked_at = NULL, last_run_at = clock_timestamp()
 WHERE id = %(id)s AND locked_at = %(locked_at)s
RETURNING id;

-- unlock_idempotency_key --
-- After a failure before commit: free the key so the client can retry
UPDATE idempotency_keys
   SET locked_at = NULL
 WHERE id = %(id)s AND locked_at = %(locked_at)s AND recovery_point <> 'finished';
