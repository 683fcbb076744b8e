"""Flask extensions, created unbound and bound in ``create_app``."""

from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy

from app.api import Api

db = SQLAlchemy()
migrate = Migrate()
api = Api()
