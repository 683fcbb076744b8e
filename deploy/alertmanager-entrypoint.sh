#!/bin/sh
# Entry point of the Alertmanager container (docker-compose.yml): render
# deploy/alertmanager.yml's placeholders from the environment, then become
# Alertmanager. Alertmanager reads no environment variables in its configuration,
# and the bot token must stay out of the repository.
#
#   alertmanager-entrypoint.sh [alertmanager flags...]   render, then exec alertmanager
#   alertmanager-entrypoint.sh --render-only             render and stop (tests)
#
# ALERTMANAGER_TEMPLATE and ALERTMANAGER_CONFIG name the template and the rendered
# copy (the container's defaults below). POSIX sh and awk only: the image is busybox.
set -eu

template=${ALERTMANAGER_TEMPLATE:-/etc/alertmanager/alertmanager.tmpl.yml}
config=${ALERTMANAGER_CONFIG:-/tmp/alertmanager.yml}

fail() {
    echo "alertmanager-entrypoint: $*" >&2
    exit 1
}

# Required: an alert that reaches nobody is the problem this container solves, so
# a missing setting stops it with one line instead of starting it mute.
missing=""
for name in ALERT_TELEGRAM_BOT_TOKEN ALERT_TELEGRAM_CHAT_ID ALERT_EMAIL_TO \
            ALERT_SMTP_HOST ALERT_SMTP_FROM; do
    eval "value=\${$name:-}"
    [ -n "$value" ] || missing="$missing $name"
done
[ -z "$missing" ] || fail "set$missing (see the Alerts section of README.md)"

# Optional: no user = no SMTP authentication.
ALERT_SMTP_USER=${ALERT_SMTP_USER:-}
ALERT_SMTP_PASSWORD=${ALERT_SMTP_PASSWORD:-}
export ALERT_SMTP_USER ALERT_SMTP_PASSWORD

# Shapes checked here, so a typo is a clear line now, not a Telegram error on the
# first alert. The token goes inside quotes, the chat id bare (Alertmanager wants
# an integer: a user's id, or a group's negative one).
printf '%s' "$ALERT_TELEGRAM_BOT_TOKEN" | grep -Eq '^[0-9]+:[A-Za-z0-9_-]+$' \
    || fail "ALERT_TELEGRAM_BOT_TOKEN does not look like a bot token (digits:letters, from @BotFather)"
printf '%s' "$ALERT_TELEGRAM_CHAT_ID" | grep -Eq '^-?[0-9]+$' \
    || fail "ALERT_TELEGRAM_CHAT_ID must be a number (e.g. 123456789 or -1001234567890), not a @name"
case "$ALERT_SMTP_HOST" in
    *:[0-9]*) ;;
    *) fail "ALERT_SMTP_HOST must be host:port (e.g. smtp.example.com:587)" ;;
esac

# Every ${NAME} of the template is replaced by that variable's value with each '
# doubled (the template quotes strings with '...', where '' is a quote). A value
# with a line break, or a placeholder whose variable is unset, stops the render.
umask 077
awk '
    BEGIN { quote = "\047" }
    {
        line = $0
        out = ""
        while (match(line, /[$][{][A-Z0-9_]+[}]/)) {
            name = substr(line, RSTART + 2, RLENGTH - 3)
            if (!(name in ENVIRON)) {
                print "alertmanager-entrypoint: " name " is not set" > "/dev/stderr"
                exit 1
            }
            value = ENVIRON[name]
            if (index(value, "\n") || index(value, "\r")) {
                print "alertmanager-entrypoint: " name " holds a line break" > "/dev/stderr"
                exit 1
            }
            gsub(quote, quote quote, value)
            out = out substr(line, 1, RSTART - 1) value
            line = substr(line, RSTART + RLENGTH)
        }
        print out line
    }
' "$template" >"$config.tmp" || { rm -f "$config.tmp"; exit 1; }
mv -f "$config.tmp" "$config"

if [ "${1:-}" = "--render-only" ]; then
    exit 0
fi
exec /bin/alertmanager --config.file="$config" "$@"
