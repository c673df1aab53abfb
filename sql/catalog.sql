-- upsert_product --
-- Insert or update a product and record the stock change in the ledger
WITH previous AS (
    SELECT available FROM products WHERE sku = %(sku)s FOR UPDATE
), upserted AS (
    INSERT INTO products (sku, name, price_cents, currency, available)
    VALUES (%(sku)s, %(name)s, %(price_cents)s, %(currency)s, %(available)s)
    ON CONFLICT (sku) DO UPDATE
       SET name = excluded.name, price_cents = excluded.price_cents,
           currency = excluded.currency, available = excluded.available, updated_at = now()
 RETURNING sku, available
)
INSERT INTO stock_ledger (sku, kind, delta)
SELECT upserted.sku, 'load', upserted.available - COALESCE((SELECT available FROM previous), 0)
  FROM upserted
 WHERE upserted.available <> COALESCE((SELECT available FROM previous), 0);

-- list_products --
-- Every product with its available stock
SELECT sku, name, price_cents, currency, available
  FROM products
 ORDER BY sku;
