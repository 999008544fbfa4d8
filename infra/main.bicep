// billing-crm-sync on Azure: a Flex Consumption Functions app, keyless storage, Key Vault, Application Insights,
// alerts to email and Teams, and a health workbook. Deploy with `azd up`, or `az deployment group create` (README).
targetScope = 'resourceGroup'

@minLength(1)
@maxLength(40)
@description('Environment name (azd sets it); part of every resource name.')
param environmentName string

@description('Region of every resource.')
param location string = resourceGroup().location

@description('Billing API base URL, https://...')
@minLength(9)
param billingBaseUrl string

@description('Dataverse organization URL, https://ORG.crm.dynamics.com')
@minLength(9)
param dataverseUrl string

@description('Who receives alert emails (at least one address).')
@minLength(1)
param alertEmails array

@description('Write the secrets below into Key Vault: true on the first deployment (or to replace them on purpose); false afterwards, so a provision never undoes a rotation done in Key Vault (docs/operations.md, "Rotating secrets").')
param seedSecrets bool = false

@secure()
@description('Billing API key, written to Key Vault when seedSecrets is true (ignored otherwise).')
param billingApiKey string = ''

@secure()
@description('Billing webhook HMAC secret, written to Key Vault when seedSecrets is true (ignored otherwise).')
param billingWebhookSecret string = ''

@allowed(['client_secret', 'managed_identity'])
@description('How the app signs in to Dataverse: application users with secrets, or the app\'s managed identity.')
param dataverseAuth string = 'client_secret'

@description('Entra tenant of the Dataverse application users (client_secret only).')
param dataverseTenantId string = subscription().tenantId

@description('Application (client) ids of the Dataverse application users, comma-separated (client_secret only).')
param dataverseClientIds string = ''

@secure()
@description('Their client secrets, comma-separated, in the same order; written to Key Vault when seedSecrets is true.')
param dataverseClientSecret string = ''

@secure()
@description('Teams Workflows webhook URL for alerts; empty: email only.')
param teamsWebhookUrl string = ''

@description('Billing entities to sync (SYNC_ENTITIES), comma-separated; the missed-run alert watches each.')
@allowed(['customers,invoices', 'customers', 'invoices'])
param syncEntities string = 'customers,invoices'

@description('Billing pagination of this account.')
@allowed(['cursor', 'offset'])
param billingPagination string = 'cursor'

@description('Requests per second the app allows itself against billing (a little under the platform limit).')
param billingRateLimitRps string = '10'

@description('Fan-out schedule, NCRONTAB with seconds first.')
param syncSchedule string = '0 */5 * * * *'

@description('Reconcile schedule (the CRM compared with billing, the healable healed), NCRONTAB with seconds first.')
param reconcileSchedule string = '0 0 2 * * *'

@description('Minutes between fan-out ticks, for the missed-run, breaker and lag alerts; 0: derived from syncSchedule (every N minutes "S */N * * * *", every minute, hourly "S M * * * *", every H hours "S M */H * * *").')
@minValue(0)
param scheduleIntervalMinutes int = 0

@description('Maximum instances. 40 deploys under every reading of Flex Consumption\'s lowest allowed value (some pages say 40, others 1); the instances share the Dataverse application users\' budget (docs/scaling.md).')
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Instance memory (MB).')
@allowed([512, 2048, 4096])
param instanceMemoryMB int = 2048

@description('Concurrent Dataverse requests per application user per instance.')
@minValue(1)
@maxValue(52)
param dataverseMaxConcurrency int = 8

// Alert thresholds: the runbook, docs/operations.md "Alerts and what to do", says what each means and what to do.
@description('Failure rate (%) over a rolling hour.')
param failureRatePercent string = '0.5'
@description('Open DLQ rows.')
param dlqOpenRowsThreshold int = 50
@description('Poison messages in 15 minutes (0: any).')
param poisonMessagesThreshold int = 0
@description('Schedule intervals without a completed listing.')
param missedRunIntervals int = 3
@description('Minutes a breaker may stay open (through its half-open probes).')
@minValue(1)
param breakerOpenMinutes int = 10
@description('Exceptions in 15 minutes.')
param exceptionBurstThreshold int = 10
@description('Minutes of lag (since the last complete listing started) before the lag alert fires.')
@minValue(1)
param lagMinutes int = 60
@description('Refused billing webhooks (bad signature, stale, malformed) in 15 minutes before the alert fires.')
@minValue(0)
param webhookRejectionsThreshold int = 10
@description('Reconcile drift (records that differ / records compared, newest complete run, per entity) above which the drift alert fires; a decimal with a dot.')
param reconcileDriftRatio string = '0.01'
@description('Differences reconcile finds that were not open before, in a day, above which the alert fires.')
@minValue(0)
param reconcileNewMismatchesThreshold int = 25

@description('Now; secrets expire a year later (leave the default).')
param deployedAt string = utcNow()

var abbrs = loadJsonContent('abbreviations.json')
var resourceToken = toLower(uniqueString(subscription().id, resourceGroup().id, environmentName, location))
var tags = { 'azd-env-name': environmentName, application: 'billing-crm-sync' }
var queueName = 'billing-sync'
var deploymentContainerName = 'app-package-${take(resourceToken, 8)}'

// Inputs no @allowed or @minLength can check: fail() stops the deployment with a message naming the parameter.
// Each is checked here, before any resource that uses it.
var alertEmailList = [for email in alertEmails: trim(email)]
var checkedEmails = empty(join(alertEmailList, '')) ? fail('alertEmails (ALERT_EMAILS): give at least one address that receives the alerts') : (contains(alertEmailList, '') ? fail('alertEmails (ALERT_EMAILS): an empty address (a stray comma?)') : alertEmailList)
var checkedBillingUrl = startsWith(billingBaseUrl, 'https://') ? billingBaseUrl : fail('billingBaseUrl (BILLING_BASE_URL): must be an https:// URL')
var checkedDataverseUrl = startsWith(dataverseUrl, 'https://') ? dataverseUrl : fail('dataverseUrl (DATAVERSE_URL): must be an https:// URL, https://ORG.crm.dynamics.com')
var usesClientSecret = dataverseAuth == 'client_secret'
var checkedClientIds = usesClientSecret && empty(trim(dataverseClientIds)) ? fail('dataverseClientIds (DATAVERSE_CLIENT_ID): required when dataverseAuth is client_secret') : dataverseClientIds
var checkedBillingApiKey = seedSecrets && empty(billingApiKey) ? fail('billingApiKey (BILLING_API_KEY): required when seedSecrets (SEED_SECRETS) is true') : billingApiKey
var checkedWebhookSecret = seedSecrets && empty(billingWebhookSecret) ? fail('billingWebhookSecret (BILLING_WEBHOOK_SECRET): required when seedSecrets (SEED_SECRETS) is true') : billingWebhookSecret
var checkedClientSecret = seedSecrets && usesClientSecret && empty(dataverseClientSecret) ? fail('dataverseClientSecret (DATAVERSE_CLIENT_SECRET): required when dataverseAuth is client_secret and seedSecrets (SEED_SECRETS) is true') : dataverseClientSecret

// The failure-rate threshold is a string (Bicep has no decimals): digits with at most one dot, above 0 and below
// 100. "0,5" would otherwise reach the query as text that never compares true, and the rule would never fire.
var failureRateRest = replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(failureRatePercent, '0', ''), '1', ''), '2', ''), '3', ''), '4', ''), '5', ''), '6', ''), '7', ''), '8', ''), '9', '')
var failureRateShaped = !empty(failureRatePercent) && (empty(failureRateRest) || failureRateRest == '.') && !startsWith(failureRatePercent, '.') && !endsWith(failureRatePercent, '.')
var checkedFailureRate = failureRateShaped ? (int(split(failureRatePercent, '.')[0]) < 100 && !empty(replace(replace(failureRatePercent, '0', ''), '.', '')) ? failureRatePercent : fail('failureRatePercent: must be above 0 and below 100 (got "${failureRatePercent}")')) : fail('failureRatePercent: a number with a dot for decimals, like 0.5 (got "${failureRatePercent}")')

// The schedule interval, from the NCRONTAB schedule (seconds minutes hours days months weekdays) where its shape says
// it; any other shape needs scheduleIntervalMinutes.
var scheduleFields = length(split(trim(syncSchedule), ' ')) == 6 ? split(trim(syncSchedule), ' ') : fail('syncSchedule (SYNC_SCHEDULE): NCRONTAB needs six fields, seconds first, like "0 */5 * * * *" (got "${syncSchedule}")')
var scheduleMinuteField = scheduleFields[1]
var scheduleHourField = scheduleFields[2]
var scheduleMinuteIsNumber = !contains(scheduleMinuteField, '*') && !contains(scheduleMinuteField, ',') && !contains(scheduleMinuteField, '-') && !contains(scheduleMinuteField, '/')
var derivedIntervalMinutes = scheduleHourField == '*' ? (scheduleMinuteField == '*' ? 1 : (startsWith(scheduleMinuteField, '*/') ? int(substring(scheduleMinuteField, 2)) : (scheduleMinuteIsNumber ? 60 : 0))) : (scheduleMinuteIsNumber && startsWith(scheduleHourField, '*/') ? 60 * int(substring(scheduleHourField, 2)) : 0)
var intervalMinutes = scheduleIntervalMinutes > 0 ? scheduleIntervalMinutes : (derivedIntervalMinutes > 0 ? derivedIntervalMinutes : fail('scheduleIntervalMinutes: cannot be derived from syncSchedule "${syncSchedule}"; set it to the minutes between fan-out ticks'))

module identity 'app/identity.bicep' = {
  name: 'identity'
  params: { name: '${abbrs.managedIdentity}${resourceToken}', location: location, tags: tags }
}

module storage 'app/storage.bicep' = {
  name: 'storage'
  params: {
    name: '${abbrs.storageAccount}${resourceToken}'
    location: location
    tags: tags
    deploymentContainerName: deploymentContainerName
    queueName: queueName
  }
}

module monitoring 'app/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    logAnalyticsName: '${abbrs.logAnalyticsWorkspace}${resourceToken}'
    applicationInsightsName: '${abbrs.applicationInsights}${resourceToken}'
    location: location
    tags: tags
  }
}

module vault 'app/keyvault.bicep' = {
  name: 'keyvault'
  params: {
    name: '${abbrs.keyVault}${take(resourceToken, 20)}'
    location: location
    tags: tags
    seedSecrets: seedSecrets
    billingApiKey: checkedBillingApiKey
    billingWebhookSecret: checkedWebhookSecret
    dataverseClientSecret: usesClientSecret ? checkedClientSecret : ''
    issuedAt: deployedAt
  }
}

module rbac 'app/rbac.bicep' = {
  name: 'rbac'
  params: {
    principalId: identity.outputs.principalId
    storageAccountName: storage.outputs.name
    keyVaultName: vault.outputs.name
    applicationInsightsName: monitoring.outputs.applicationInsightsName
  }
}

// Key Vault references without a version: the app always reads a secret's current version (the platform refreshes
// references within a day, or at once on restart), so rotating in Key Vault alone is enough.
var clientSecretSettings = {
  DATAVERSE_TENANT_ID: dataverseTenantId
  DATAVERSE_CLIENT_ID: checkedClientIds
  DATAVERSE_CLIENT_SECRET: '@Microsoft.KeyVault(SecretUri=${vault.outputs.dataverseSecretUri})'
}
var syncBaseSettings = {
  SYNC_SCHEDULE: syncSchedule
  RECONCILE_SCHEDULE: reconcileSchedule
  SYNC_QUEUE: queueName
  SYNC_ENTITIES: syncEntities
  BILLING_BASE_URL: checkedBillingUrl
  BILLING_PAGINATION: billingPagination
  BILLING_RATE_LIMIT_RPS: billingRateLimitRps
  BILLING_API_KEY: '@Microsoft.KeyVault(SecretUri=${vault.outputs.billingApiKeyUri})'
  BILLING_WEBHOOK_SECRET: '@Microsoft.KeyVault(SecretUri=${vault.outputs.webhookSecretUri})'
  DATAVERSE_URL: checkedDataverseUrl
  DATAVERSE_AUTH: dataverseAuth
  DATAVERSE_MAX_CONCURRENCY: string(dataverseMaxConcurrency)
  DATAVERSE_FLEET_SIZE: string(maximumInstanceCount)
}
var secretSettings = usesClientSecret ? clientSecretSettings : {}

module function 'app/function.bicep' = {
  name: 'function'
  dependsOn: [rbac]
  params: {
    planName: '${abbrs.appServicePlan}${resourceToken}'
    appName: '${abbrs.functionApp}${resourceToken}'
    location: location
    tags: tags
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    storageAccountName: storage.outputs.name
    blobServiceUri: storage.outputs.blobEndpoint
    queueServiceUri: storage.outputs.queueEndpoint
    tableServiceUri: storage.outputs.tableEndpoint
    deploymentContainerName: deploymentContainerName
    applicationInsightsConnectionString: monitoring.outputs.connectionString
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
    syncSettings: union(syncBaseSettings, secretSettings)
  }
}

module alerts 'app/alerts.bicep' = {
  name: 'alerts'
  params: {
    namePrefix: '${abbrs.alertRule}${resourceToken}-'
    teamsRelayName: '${abbrs.logicApp}${resourceToken}-teams'
    location: location
    tags: tags
    applicationInsightsId: monitoring.outputs.applicationInsightsId
    alertEmails: checkedEmails
    teamsWebhookUrl: teamsWebhookUrl
    entities: split(syncEntities, ',')
    failureRatePercent: checkedFailureRate
    dlqOpenRowsThreshold: dlqOpenRowsThreshold
    poisonMessagesThreshold: poisonMessagesThreshold
    scheduleIntervalMinutes: intervalMinutes
    missedRunIntervals: missedRunIntervals
    breakerOpenMinutes: breakerOpenMinutes
    exceptionBurstThreshold: exceptionBurstThreshold
    lagMinutes: lagMinutes
    webhookRejectionsThreshold: webhookRejectionsThreshold
    reconcileDriftRatio: reconcileDriftRatio
    reconcileNewMismatchesThreshold: reconcileNewMismatchesThreshold
    keyVaultId: vault.outputs.id
    keyVaultLocation: location
  }
}

module workbook 'app/workbook.bicep' = {
  name: 'workbook'
  params: {
    name: guid(resourceGroup().id, environmentName, 'billing-sync-health')
    location: location
    tags: tags
    applicationInsightsId: monitoring.outputs.applicationInsightsId
  }
}

output AZURE_FUNCTION_APP_NAME string = function.outputs.name
output SERVICE_SYNC_URI string = function.outputs.uri
output AZURE_KEY_VAULT_NAME string = vault.outputs.name
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output APPLICATIONINSIGHTS_NAME string = monitoring.outputs.applicationInsightsName
