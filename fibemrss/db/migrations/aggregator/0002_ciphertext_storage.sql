-- Ciphertexts are incompressible: store them out of line without trying to compress them.
ALTER TABLE submission_chunks ALTER COLUMN ciphertext SET STORAGE EXTERNAL;
ALTER TABLE aggregates ALTER COLUMN ciphertext SET STORAGE EXTERNAL;
