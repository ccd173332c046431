-- Argo CD health of a ringmaster.dev InferenceService, from its conditions (argocd-cm
-- key resource.customizations.health.ringmaster.dev_InferenceService): Healthy when
-- Ready, Degraded when Stalled (failed job, missing checkpoint, stalled rollout, refused
-- spec), Progressing otherwise (waiting for its TrainingJob, rolling out).
local hs = {status = "Progressing", message = "Waiting for the operator"}
if obj.status == nil then
  return hs
end
local generation = obj.metadata.generation
if generation ~= nil and (obj.status.observedGeneration == nil or obj.status.observedGeneration < generation) then
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end
local ready, stalled
for _, condition in ipairs(obj.status.conditions or {}) do
  if condition.type == "Ready" then
    ready = condition
  elseif condition.type == "Stalled" then
    stalled = condition
  end
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message
elseif stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = stalled.reason .. ": " .. stalled.message
elseif ready ~= nil then
  hs.message = ready.reason .. ": " .. ready.message
end
return hs
