using './main.bicep'

// Values come from the environment (azd sets AZURE_ENV_NAME; the rest you set with `azd env set NAME value`, one a call, or
// export them before `az deployment group create`). Nothing secret is written here.
param environmentName = readEnvironmentVariable('AZURE_ENV_NAME', 'billing-sync')
param location = readEnvironmentVariable('AZURE_LOCATION', 'westeurope')
param billingBaseUrl = readEnvironmentVariable('BILLING_BASE_URL')
param dataverseUrl = readEnvironmentVariable('DATAVERSE_URL')
param alertEmails = split(readEnvironmentVariable('ALERT_EMAILS'), ',')
// Secrets are written to Key Vault only with SEED_SECRETS=true (the first deployment); afterwards rotate them in Key
// Vault and leave SEED_SECRETS unset or false, so that a provision never writes an old value back.
param seedSecrets = bool(readEnvironmentVariable('SEED_SECRETS', 'false'))
param billingApiKey = readEnvironmentVariable('BILLING_API_KEY', '')
param billingWebhookSecret = readEnvironmentVariable('BILLING_WEBHOOK_SECRET', '')
param dataverseAuth = readEnvironmentVariable('DATAVERSE_AUTH', 'client_secret')
param dataverseClientIds = readEnvironmentVariable('DATAVERSE_CLIENT_ID', '')
param dataverseClientSecret = readEnvironmentVariable('DATAVERSE_CLIENT_SECRET', '')
param teamsWebhookUrl = readEnvironmentVariable('TEAMS_WEBHOOK_URL', '')
param syncEntities = readEnvironmentVariable('SYNC_ENTITIES', 'customers,invoices')
param syncSchedule = readEnvironmentVariable('SYNC_SCHEDULE', '0 */5 * * * *')
param reconcileSchedule = readEnvironmentVariable('RECONCILE_SCHEDULE', '0 0 2 * * *')
