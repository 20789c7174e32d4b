-- Every name lookup that is not limited to live repositories (GET by name shows the live one, else
-- the newest deleted one; the listing walks (name, id) in any state) needs an index on name that
-- has no predicate: the partial unique indexes of 20261202000030 cannot serve `WHERE name = $1`
-- alone, nor a generic plan of the listing, so those fell back to a sequential scan that grew
-- with the table (issue 12: GET by name went from 2.8k to 0.46k req/s as rows were added).
CREATE INDEX backup_repositories_name_id ON backup_repositories (name, id);
