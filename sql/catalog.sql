-- catalog_lock_products --
-- The catalog's SKUs as they stand, locked in SKU order (as reserve_stock locks them) while a file is applied
SELECT sku, name, price_cents, currency, available, loaded_available
  FROM products
 WHERE sku = ANY(%(skus)s::text[])
 ORDER BY sku
   FOR UPDATE;

-- catalog_insert_product --
-- A SKU the catalog brings for the first time (the products trigger records its stock as a load)
INSERT INTO products (sku, name, price_cents, currency, available, loaded_available, ledger_note)
VALUES (%(sku)s, %(name)s, %(price_cents)s, %(currency)s, %(available)s, %(loaded_available)s,
        'load');

-- catalog_update_product --
-- Apply a catalog file to a locked SKU (a stock change is recorded by the products trigger as a load)
UPDATE products
   SET name = %(name)s, price_cents = %(price_cents)s, currency = %(currency)s,
       available = %(available)s, loaded_available = %(loaded_available)s, ledger_note = 'load',
       updated_at = now()
 WHERE sku = %(sku)s;

-- list_products --
-- Every product with its available stock
SELECT sku, name, price_cents, currency, available
  FROM products
 ORDER BY sku;
