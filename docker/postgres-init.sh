#!/bin/sh
# First start of the postgres container: one database per server, owned by POSTGRES_USER.
set -e
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<SQL
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
SQL
