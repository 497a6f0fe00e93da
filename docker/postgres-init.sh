#!/bin/sh
# First start of the postgres container: one database per server (and Optuna's studies), owned by POSTGRES_USER.
# A pgdata volume made before `optuna` was added: docker compose exec postgres createdb -U torchcycle optuna
set -e
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<SQL
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
CREATE DATABASE optuna;
SQL
