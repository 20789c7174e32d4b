-- BP_ENCRYPTION_KEY can be rotated (BP_PREVIOUS_ENCRYPTION_KEYS keeps the earlier keys): each
-- sealed row names the key that sealed it (the first 8 bytes of the key's SHA-256, hex). Rows
-- sealed before this migration have none and are tried with every key; a row opened with a
-- previous key (or with no id) is re-sealed with the current key when it is used.
ALTER TABLE secret_material ADD COLUMN encryption_key_id text;
