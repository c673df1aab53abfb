-- insert_cart --
-- Create a cart with its lines (prices are read from products when the order is placed)
WITH cart AS (
    INSERT INTO carts (id, user_id, shipping_address, email)
    VALUES (%(cart_id)s, %(user_id)s, %(shipping_address)s, %(email)s)
 RETURNING id, user_id, status, shipping_address, email, created_at, ordered_at
), lines AS (
    INSERT INTO cart_lines (cart_id, sku, qty)
    SELECT cart.id, l.sku, l.qty
      FROM cart, unnest(%(skus)s::text[], %(qtys)s::int[]) AS l(sku, qty)
)
SELECT * FROM cart;

-- known_skus --
-- Which of the given SKUs exist
SELECT sku FROM products WHERE sku = ANY(%(skus)s::text[]);

-- get_cart --
-- One of the caller's carts with its lines and current prices
SELECT c.id, c.user_id, c.status, c.shipping_address, c.email, c.created_at, c.ordered_at,
       COALESCE(
           (SELECT json_agg(json_build_object(
                        'sku', l.sku, 'qty', l.qty, 'unit_price_cents', p.price_cents,
                        'currency', p.currency) ORDER BY l.sku)
              FROM cart_lines l JOIN products p USING (sku)
             WHERE l.cart_id = c.id),
           '[]'::json) AS lines
  FROM carts c
 WHERE c.id = %(cart_id)s AND c.user_id = %(user_id)s;
