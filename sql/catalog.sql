-- catalog_lock_product --
-- One SKU of a catalog file as it stands, locked while the file is applied, with the stock put in so far (its load and adjust rows)
SELECT p.sku, p.name, p.price_cents, p.currency, p.available, p.loaded_available,
       (SELECT COALESCE(sum(l.delta), 0)::int FROM stock_ledger l
         WHERE l.sku = p.sku AND l.kind IN ('load', 'adjust')) AS put_in
  FROM products p
 WHERE p.sku = %(sku)s
   FOR UPDATE OF p;

-- catalog_insert_product --
-- A SKU the catalog brings for the first time (the products trigger records its stock as a load); nothing if another writer just created it
INSERT INTO products (sku, name, price_cents, currency, available, loaded_available, ledger_note)
VALUES (%(sku)s, %(name)s, %(price_cents)s, %(currency)s, %(available)s, %(loaded_available)s,
        'load')
    ON CONFLICT (sku) DO NOTHING
RETURNING sku;

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
